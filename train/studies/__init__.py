"""Studies of the training side, run from the command line (``python -m train speed|speed-ddp|compare|
compress-study|calibration-study``): they train, time and compare, and write reports; nothing in training or
export imports them.

- ``speed``: training throughput, our loop against deepctr-torch's ``fit()``, and ``train fit`` under torchrun with
  1, 2, ... processes (``speed-ddp``);
- ``all_gather``: the data-parallel all-gather timed alone (``torchrun -m train.studies.all_gather FLOATS``);
- ``compare``: DeepFM, AutoInt, DCNv2, TabTransformer, logistic regression and LightGBM on the same split;
- ``calibration``: the served calibration against the synthetic truth over seeds and data sizes;
- ``compress_study``: every compression method on DeepFM and AutoInt;
- ``latency``: a graph's serving latency, measured as the bidder serves.
"""
