"""Tutorial 1: neurons and state."""
# %% single step
import matplotlib.pyplot as plt
import torch

from snnkit import functional, neuron

torch.manual_seed(0)
lif = neuron.LIFNode(tau=4.0, v_threshold=1.0, v_reset=0.0)  # step_mode="s" by default
x_seq = torch.full((30, 1), 1.3)  # a constant input current, 30 steps, one neuron
x_seq[20:] = 0.0  # switched off after step 20

spikes, v_trace = [], []
for x in x_seq:  # one call per step; lif.v carries the potential between calls
    spikes.append(lif(x))
    v_trace.append(lif.v)
spikes, v_trace = torch.stack(spikes), torch.stack(v_trace)
# %% multi step
lif.reset()  # v back to v_reset (the float 0.0)
lif.step_mode = "m"  # now one call takes the whole sequence [T, N, *]
lif.store_v_seq = True  # keep the potential of every step as lif.v_seq
spikes_m = lif(x_seq)
assert torch.equal(spikes_m, spikes)  # same spikes as 30 single steps
assert torch.allclose(lif.v_seq, v_trace)
# %% save and restore
lif.reset()
snapshot = lif.save_memories()  # {"v": 0.0}: references, not copies
first = lif(x_seq[:10])
lif.load_memories(snapshot)  # back to the state before the call
assert torch.equal(lif(x_seq[:10]), first)  # the rerun is identical
functional.reset_net(lif)  # resets every MemoryModule of a network
assert lif.v == 0.0
# %% plot
if_node = neuron.IFNode(step_mode="m", store_v_seq=True)
if_spikes = if_node(0.3 * x_seq)  # a weaker input: IF does not leak
fig, ax = plt.subplots()
ax.plot(v_trace[:, 0], label="LIF potential v", color="tab:blue")
ax.plot(if_node.v_seq[:, 0], label="IF potential v", color="tab:orange", alpha=0.7)
ax.axhline(1.0, color="gray", ls="--", lw=1, label="threshold")
t = torch.arange(len(x_seq))
ax.plot(t[spikes[:, 0] > 0], torch.full_like(t[spikes[:, 0] > 0], 1.15, dtype=torch.float32), "|",
        color="tab:blue", ms=12, label="LIF spikes")
ax.set(xlabel="time step", ylabel="membrane potential")
ax.legend(loc="upper right", fontsize=8)
fig.tight_layout()
