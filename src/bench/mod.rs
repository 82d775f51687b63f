//! Benchmarks users run: the main job (`prunekit bench`: training step time of pruned
//! ResNet50s against FLOP-ideal speedups) and the convolution microbenchmark
//! (`prunekit conv-bench`), and the per-op profile table of `prunekit bench --profile`.

pub mod conv;
pub mod plot;
pub mod profile;
pub mod train;
