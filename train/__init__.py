"""Training and export for the bidder's CTR models (``python -m train ...``).

    data/ipinyou.py     stream make-ipinyou-data logs into raw records
    data/synthetic.py   iPinYou-style logs with a known true CTR (the default data set)
    data/dataset.py     featurize with the bidder's own featurizer, split by time
    models.py           deepctr-torch models over the feature spec, hyper-parameters
    trainer.py          the training loop with early stopping
    evaluate.py         AUC / log loss, the oracle's figures
    export.py           the lean ONNX graph, the stock one, the parity check
    bundle.py           a trained model's meta.json record, written through bidder/bundle.py
    compress/           compressing a bundle, one module per method
    fit.py              one model from logs to bundle
    compare.py          the DeepFM / AutoInt / DCNv2 / logistic-regression study
    latency.py          serving latency as the bidder runs it
"""
