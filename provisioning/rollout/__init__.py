"""The operator side of fleet model deployment: release keys, bundles, the chunk service and staged rollouts."""
