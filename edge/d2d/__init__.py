"""Device-to-device: peer discovery, distance-based sharding, llama.cpp RPC across peers."""
