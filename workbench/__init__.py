"""workbench: ensemble research workbench for PyTorch image classifiers."""
