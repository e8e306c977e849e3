//! `config.kdl` → a typed, validated [`Config`].

mod model;

pub use model::*;
