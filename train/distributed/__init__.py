"""Data-parallel training under ``torchrun``: one process per core (or machine), torch.distributed (gloo) on CPU.

``torchrun --nproc-per-node N -m train fit ...`` starts N copies of the command; each reads the data, builds the
same model from the same seed and trains on its share of every batch. The optimizer (``train.optim``) sums the
gradients of all processes before each step, so every process takes the same step a single process would take on
the whole batch (``batch_size`` is the global batch), and the models stay identical. Process 0 evaluates, decides
early stopping for all, and writes the bundle. Without torchrun's environment every function here is a no-op.

    group.py        joining torchrun's process group; the collectives that always go through gloo
    shards.py       which rows of each batch, and which range of a flat tensor, a process takes
    shm.py          shared memory on one machine: the all-gather through it (LocalGather), shared tensors
    _flags.pyx      that all-gather's flags: a release store, and a spin until every process published
    gather.py       the all-gather and the barrier, through shared memory where it can, else gloo
    wire.py         the gradient exchange's message: written, all-gathered, summed (``exchange``)
    shared_step.py  the optimizer's step with shared parameters, planned once (``SharedStep``)
"""
