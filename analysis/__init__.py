"""analysis: the paper's figures and tables rebuilt from MLflow (issue 5 of 5)."""
