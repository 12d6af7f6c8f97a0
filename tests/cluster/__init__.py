"""The cluster suite: shoprec's code and its promises on the local cluster profile
(three Kafka nodes, a Redis Cluster of three primaries and three replicas, two Tritons),
with real rees46 events streaming through real workers while parts of it fail."""
