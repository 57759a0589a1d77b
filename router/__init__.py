"""The stateless router: picks a shard for each request and fronts the admin API."""
