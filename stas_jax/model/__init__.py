"""The network: LIF neurons, (I-)SPS patch embedding, SSA blocks, ACT halting over the (timestep,
block) grid, early-exit inference and energy accounting. Imports nothing from train/ or tools/."""
