"""One cell's story (`run`): its data, skipped if done, computed, logged once in its MLflow run
(`mlflow_run`); the tuning on validation (`tune`), the linear probe (`probe`) and what the cell
cost (`cost`)."""
