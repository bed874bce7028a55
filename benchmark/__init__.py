"""Transfer-learning benchmark harness: fine-tune or freeze, on your data, with which backbone."""
