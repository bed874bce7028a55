"""The networks and how they are trained: pretrained backbones with their preprocessing and
stages (`backbones`), the LightningModule, its recipes and callbacks (`classifier`), a frozen
backbone's cached features (`features`) and `trainer.precision=auto` (`precision`)."""
