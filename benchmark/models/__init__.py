"""The networks and how they are trained: pretrained backbones with their preprocessing and
stages (`backbones`), the LightningModule, its recipes and callbacks (`classifier`), a frozen
backbone's cached features (`features`), `trainer.precision=auto` (`precision`) and a cell's
model as an MLflow pyfunc model that predicts class names from image paths (`served`)."""
