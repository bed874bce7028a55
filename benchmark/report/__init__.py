"""From MLflow runs to the answer: tables (md, csv, tex) and a page of pictures (html)."""
