"""Data: reading stacks, sources, preparation, patches, augmentation, the generator and painted annotations."""
