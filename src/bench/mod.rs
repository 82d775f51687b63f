//! Benchmarks users run: the main job (`prunekit bench`: training step time of pruned
//! ResNet50s against FLOP-ideal speedups) and the convolution microbenchmark
//! (`prunekit conv-bench`).

pub mod conv;
pub mod plot;
pub mod train;
