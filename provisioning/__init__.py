"""Fleet provisioning: the operator's CA and inventory (``fleet``) and the device side (``provision-device``)."""
