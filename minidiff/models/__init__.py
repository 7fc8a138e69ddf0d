"""The networks: layers, attention, the two UNets, the VAE, CLIP and its tokenizer."""
