"""The code an MLflow served model is loaded from (MLflow's "models from code": the logged model
keeps a copy of this file, not a pickled object): the pyfunc model of benchmark.models.served,
whose `load_context` then builds the network from the model's artifact and config."""

from mlflow.models import set_model

from benchmark.models.served import ServedClassifier

set_model(ServedClassifier())
