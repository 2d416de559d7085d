"""Tutorial 2: build and train a spiking CNN on the 8x8 digits (two epochs, CPU)."""
# %% data
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from snnkit import functional
from snnkit.examples.digits import SpikingCNN, load_digits

torch.manual_seed(0)
x_train, y_train, x_test, y_test = load_digits()  # [N, 1, 8, 8] in [0, 1], labels 0..9
T = 4
# %% model
net = SpikingCNN(width=16)  # every layer in step_mode="m"
opt = torch.optim.Adam(net.parameters(), lr=0.005)
# %% training loop
losses = []
for epoch in range(2):
    net.train()
    order = torch.randperm(len(y_train))
    for i in range(0, len(y_train), 64):
        idx = order[i:i + 64]
        x_seq = x_train[idx].unsqueeze(0).repeat(T, 1, 1, 1, 1)  # direct encoding: [T, N, 1, 8, 8]
        logits = net(x_seq).mean(0)  # average the read-out over time
        loss = F.cross_entropy(logits, y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        functional.reset_net(net)  # forget the state before the next batch
        losses.append(loss.item())
# %% evaluation
net.eval()
with torch.no_grad():
    pred = net(x_test.unsqueeze(0).repeat(T, 1, 1, 1, 1)).mean(0).argmax(1)
    functional.reset_net(net)
accuracy = (pred == y_test).float().mean().item()
print(f"test accuracy after 2 epochs: {100 * accuracy:.1f}%")
assert accuracy > 0.8
assert sum(losses[-5:]) < sum(losses[:5])  # the loss went down
# %% plot
fig, ax = plt.subplots()
ax.plot(losses)
ax.set(xlabel="training step", ylabel="cross-entropy loss", title=f"test accuracy {100 * accuracy:.1f}%")
fig.tight_layout()
