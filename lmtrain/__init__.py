"""lmtrain: recurrent language models (RNN, GRU, LSTM) written from the lecture's equations.

The Python API (each module imports torch; this package file does not, so `lmtrain --help` is fast):

    from lmtrain.config import load_config        # load_config("configs/quickstart.yaml", ["train.max_steps=100"])
    from lmtrain.train import train               # train(config) -> TrainResult
    from lmtrain.checkpoint import load_model     # load_model("runs/quickstart/best.pt") -> (model, tokenizer, config)
    from lmtrain.sampling import generate         # generate(model, tokenizer, num=5)
    from lmtrain.evaluate import evaluate_checkpoint
"""

__version__ = "0.1.0"
