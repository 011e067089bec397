"""Fleet model deployment, device side: signed bundles, journaled install, health-gated activation, rollback."""
