"""What runs inside a serverless worker. Imports nothing from the client."""
