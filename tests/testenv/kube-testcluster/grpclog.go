package main

import (
	"fmt"

	"google.golang.org/grpc/grpclog"
	"k8s.io/klog/v2"
)

// quietGRPCLogger routes gRPC's logs to klog like the apiserver does, but
// demotes warnings to verbosity 2: the apiserver's etcd clients log a burst
// of harmless "operation was canceled" dial warnings on every start.
type quietGRPCLogger struct{}

const grpcLogDepth = 4

func (quietGRPCLogger) Info(args ...any)   { klog.V(5).InfoSDepth(grpcLogDepth, fmt.Sprint(args...)) }
func (quietGRPCLogger) Infoln(args ...any) { klog.V(5).InfoSDepth(grpcLogDepth, fmt.Sprintln(args...)) }
func (quietGRPCLogger) Infof(format string, args ...any) {
	klog.V(5).InfoSDepth(grpcLogDepth, fmt.Sprintf(format, args...))
}
func (quietGRPCLogger) Warning(args ...any) { klog.V(2).InfoSDepth(grpcLogDepth, fmt.Sprint(args...)) }
func (quietGRPCLogger) Warningln(args ...any) {
	klog.V(2).InfoSDepth(grpcLogDepth, fmt.Sprintln(args...))
}
func (quietGRPCLogger) Warningf(format string, args ...any) {
	klog.V(2).InfoSDepth(grpcLogDepth, fmt.Sprintf(format, args...))
}
func (quietGRPCLogger) Error(args ...any)   { klog.ErrorDepth(grpcLogDepth, args...) }
func (quietGRPCLogger) Errorln(args ...any) { klog.ErrorDepth(grpcLogDepth, fmt.Sprintln(args...)) }
func (quietGRPCLogger) Errorf(format string, args ...any) {
	klog.ErrorDepth(grpcLogDepth, fmt.Sprintf(format, args...))
}
func (quietGRPCLogger) Fatal(args ...any)   { klog.FatalDepth(grpcLogDepth, args...) }
func (quietGRPCLogger) Fatalln(args ...any) { klog.FatalDepth(grpcLogDepth, fmt.Sprintln(args...)) }
func (quietGRPCLogger) Fatalf(format string, args ...any) {
	klog.FatalDepth(grpcLogDepth, fmt.Sprintf(format, args...))
}
func (quietGRPCLogger) V(l int) bool { return klog.V(klog.Level(l)).Enabled() }

func init() {
	// main's init runs after all imported packages' inits, so this wins
	// over the apiserver's own wrapper.
	grpclog.SetLoggerV2(quietGRPCLogger{})
}
