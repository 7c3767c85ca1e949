//! An HTTP/1.1 load balancer built in four phases, with blocking I/O and one thread per connection.
#![warn(missing_docs)]

pub mod demo;
