"""Tasks the training engine runs (`debiformer.engine.Task`): what differs between them."""
