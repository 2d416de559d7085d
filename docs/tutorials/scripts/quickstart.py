"""Quick start: a 2-layer spiking MLP, one sequence, one backward pass."""
import torch
import torch.nn as nn

from snnkit import functional, layer, neuron

net = nn.Sequential(layer.Linear(16, 32), neuron.LIFNode(), layer.Linear(32, 4), neuron.LIFNode())
functional.set_step_mode(net, "m")  # inputs are sequences [T, N, *], time first

x_seq = torch.rand(8, 2, 16)  # T=8 steps, a batch of N=2
out_seq = net(x_seq)  # spikes [8, 2, 4]
loss = out_seq.mean(0).sum()
loss.backward()  # backpropagation through time with surrogate gradients
functional.reset_net(net)  # state back to v_reset before the next sequence

assert out_seq.shape == (8, 2, 4)
assert net[0].weight.grad is not None
# [end]
