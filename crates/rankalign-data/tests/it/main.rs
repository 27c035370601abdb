//! Integration tests of the data crate: tokenizer ids against open_clip (and, when the
//! model is fetched, WordPiece ids against transformers), image preprocessing against
//! torchvision/open_clip, determinism of the datasets, clear errors on bad files,
//! dataset list parsers and protocol sampling.

mod benchmark;
mod files;
mod lists;
mod preprocess;
mod protocols;
mod sources;
mod tokenizer;
mod wordpiece;
