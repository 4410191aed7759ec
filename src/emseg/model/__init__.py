"""The network, its losses and BatchNorm handling, the Lightning module and one training run."""
