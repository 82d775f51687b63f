//! The measurements the CLI runs: the main job (`prunekit bench`: training step time of
//! pruned ResNet50s against FLOP-ideal speedups, [`step`]), the convolution
//! microbenchmark (`prunekit conv-bench`, [`conv`]), the plot of the main job's rows
//! ([`plot`]) and the per-op profile table of `prunekit bench --profile`
//! ([`profile_table`]) with its roofline ([`roofline`]).

pub mod conv;
pub mod plot;
pub mod profile_table;
pub mod roofline;
pub mod step;
