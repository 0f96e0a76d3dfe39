"""lmtrain: recurrent language models (RNN, GRU, LSTM) written from the lecture's equations.

The Python API (each module imports torch; this package file does not, so `lmtrain --help` is fast):

    from lmtrain.config import load_config              # load_config("configs/quickstart.yaml", ["train.max_steps=1"])
    from lmtrain.training.trainer import train          # train(config) -> TrainResult
    from lmtrain.checkpoint import load_model           # load_model(path) -> (model, tokenizer, config)
    from lmtrain.evaluation.sampling import generate    # generate(model, tokenizer, num=5)
    from lmtrain.evaluation.perplexity import evaluate_checkpoint

The folders follow the design (docs/architecture.md): model/ is the lecture's network, backprop/ its
hand-written backpropagation through time, speed/ the one place that picks how they run, data/ turns
text into batches, training/ and evaluation/ use them, and cli/ is the command line on top.
"""

__version__ = "0.1.0"
