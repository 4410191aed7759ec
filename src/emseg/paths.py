"""Every file and folder the DVC stages read and write, named once (relative to the project root).

The `dvc.yaml` files declare the same paths as deps and outs; tests/test_architecture.py fails when
the two disagree or when a module under src/emseg spells one of these paths itself.
"""

from __future__ import annotations

PARAMS = "params.yaml"
ANNOTATIONS_DIR = "annotations"                     # data.annotations' default: painted `emseg suggest` crops

RAW_DIR = "data/raw"                                # fetch
PREPARED_DIR = "data/prepared"                      # prepare
TUNE_DIR = "reports/tune"                           # tune
BEST_PARAMS = f"{TUNE_DIR}/best_params.json"
OPTUNA_DIR = "optuna"                               # tune.storage's default SQLite file lives here (DVC: persist)
MODEL_DIR = "models"
TRAINED_MODEL = f"{MODEL_DIR}/model.pt"             # train
TRAIN_DIR = "reports/train"
TRAIN_RUN = f"{TRAIN_DIR}/run.json"
CHECKPOINT_ROOT = "checkpoints"                     # git-ignored; a run's folder goes once its outputs are written
EVALUATED_MODEL = f"{MODEL_DIR}/emseg.pt"           # evaluate: the weights with their post-processing
EVALUATE_DIR = "reports/evaluate"
EVALUATE_METRICS = f"{EVALUATE_DIR}/metrics.json"
REGISTRATION = "reports/register/registration.json"  # register
PRETRAINED_MODEL = f"{MODEL_DIR}/pretrained.pt"     # pipelines/pretrain
PRETRAIN_DIR = "reports/pretrain"
LEARNING_CURVE_DIR = "reports/learning_curve"       # pipelines/learning_curve
SSL_MODEL = f"{MODEL_DIR}/ssl.pt"                   # pipelines/ssl
SSL_DIR = "reports/ssl"
ACTIVE_LEARNING_DIR = "reports/active_learning"     # pipelines/active_learning
