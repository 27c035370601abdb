//! Integration tests of the data crate: tokenizer ids against open_clip, determinism of
//! the datasets, and clear errors on bad files.

mod files;
mod tokenizer;
