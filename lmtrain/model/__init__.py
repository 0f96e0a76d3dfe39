"""The lecture's model: the cells (vanilla RNN, GRU, LSTM) one equation a line, the layers that run
them over a sequence (deep, bidirectional), the language model around them, and its regularisers."""
