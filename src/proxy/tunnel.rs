//! After `101 Switching Protocols`: the connection is no longer HTTP, and the balancer copies
//! bytes both ways until either side closes.
