"""What the Kubernetes mode shares between the receiver, the operator and the Job pods."""
