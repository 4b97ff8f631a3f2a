"""gRPC stubs generated from proto/ (do not edit them; `make proto` regenerates them):

    kiln.proto.kiln.v1.inference_pb2(_grpc)           kiln.v1.Inference
    kiln.proto.inference.grpc_predict_v2_pb2(_grpc)   inference.GRPCInferenceService (KServe v2 / Triton)

The Triton stubs define the protobuf package `inference`, as tritonclient's own do: import
them only in processes that do not also import tritonclient.grpc.
"""
