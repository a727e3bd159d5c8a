"""Training codebase (simulator, models, training, export); never copied into the image."""
