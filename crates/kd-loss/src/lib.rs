//! placeholder
mod batch;
mod ce;
mod config;
mod core;
mod dense;
mod sparse;
pub use batch::*;
pub use ce::*;
pub use config::*;
pub use dense::*;
pub use sparse::*;
