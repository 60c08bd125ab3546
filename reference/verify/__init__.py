"""`reference verify`: two checkpoints, each run by its own implementation, compared against a
noise floor measured for the model. One concern per module:

    compare.py      the verdict and the noise floor
    sides.py        what a directory is and what runs it
    hf_run.py       transformers classes and the unified model
    mcore_ranks.py  megatron-core, one spawned process per rank
    mcore_model.py  GPTModel from a checkpoint's args; its stages driven by hand
    first_layers.py the first K layers of a legacy Megatron checkpoint as one stage
    cpu.py          megatron-core's CUDA assumptions side-stepped on the CPU, restored on exit
"""
