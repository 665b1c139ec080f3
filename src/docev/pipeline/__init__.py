"""KFP pipeline support: run parameters, the steps the components call, local runs and submission."""
