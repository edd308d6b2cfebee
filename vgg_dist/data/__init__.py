"""Images in, model input out: where datasets come from (sources), how single files are decoded
(images), how batches are drawn and scaled (batches), augmentation on the device (augment), and
synthetic data for tests and benchmarks (synthetic)."""
