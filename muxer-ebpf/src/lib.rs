//! Empty library target: it exists so `muxer` can name this crate as a build dependency, which makes
//! cargo rebuild `muxer` (and so re-embed the eBPF object) whenever this crate changes.
#![no_std]
