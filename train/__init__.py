"""Training and export for the bidder's CTR models (``python -m train ...``).

    data/ipinyou.py     stream make-ipinyou-data logs into raw records
    data/synthetic.py   iPinYou-style logs with a known true CTR (the default data set)
    data/dataset.py     featurize with the bidder's own featurizer, split by time
    models.py           deepctr-torch models over the feature spec, hyper-parameters
    trainer.py          the training loop with early stopping
    optim.py            row-wise Adam over the tables, Adam over the dense layers
    fused.py            the training forward that gathers each table group's rows once
    distributed/        data-parallel training under torchrun (the gradient exchange, shared memory, gloo)
    evaluate.py         AUC / log loss, the oracle's figures
    export.py           the lean ONNX graph, the stock one, the parity check
    bundle.py           a trained model's meta.json record, written through bidder/bundle.py
    compress/           compressing a bundle, one module per method
    fit.py              one model from logs to bundle
    studies/            speed, speed-ddp, compare, compress-study: measurements, not part of training
"""
