"""How good a model is: metrics with intervals, plots, the loop report, model cards."""
