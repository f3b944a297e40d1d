"""Input data: tfds + grain pipelines, the offline MNIST demo, your own .npz images, and on-device
augmentation. Imports nothing from train/ or tools/."""
