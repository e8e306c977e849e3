//! Tests of `config.kdl` parsing through the public API.

use super::*;
