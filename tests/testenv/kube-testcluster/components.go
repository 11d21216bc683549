package main

import (
	"context"
	"fmt"
	"net/http"

	"github.com/spf13/pflag"
	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/apiserver/pkg/server/healthz"
	cliflag "k8s.io/component-base/cli/flag"
	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	apiserveroptions "k8s.io/kubernetes/cmd/kube-apiserver/app/options"
	cmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	cmoptions "k8s.io/kubernetes/cmd/kube-controller-manager/app/options"
	schedapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
	schedoptions "k8s.io/kubernetes/cmd/kube-scheduler/app/options"
)

func parseInto(name string, nfs cliflag.NamedFlagSets, args []string) error {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetNormalizeFunc(cliflag.WordSepNormalizeFunc)
	for _, f := range nfs.FlagSets {
		fs.AddFlagSet(f)
	}
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%s flags: %w", name, err)
	}
	return nil
}

// runAPIServer runs kube-apiserver in-process until ctx is cancelled. It
// mirrors app.Run, but adds extra readyz checks so that /readyz only turns
// ok once the whole test cluster (nodes, controllers) is usable.
func runAPIServer(ctx context.Context, args []string, extraReadyz ...healthz.HealthChecker) error {
	s := apiserveroptions.NewServerRunOptions()
	if err := parseInto("kube-apiserver", s.Flags(), args); err != nil {
		return err
	}
	if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	completedOptions, err := s.Complete(ctx)
	if err != nil {
		return err
	}
	if errs := completedOptions.Validate(); len(errs) != 0 {
		return utilerrors.NewAggregate(errs)
	}
	config, err := apiserverapp.NewConfig(completedOptions)
	if err != nil {
		return err
	}
	completed, err := config.Complete()
	if err != nil {
		return err
	}
	server, err := apiserverapp.CreateServerChain(completed)
	if err != nil {
		return err
	}
	if len(extraReadyz) > 0 {
		if err := server.GenericAPIServer.AddReadyzChecks(extraReadyz...); err != nil {
			return err
		}
	}
	prepared, err := server.PrepareRun()
	if err != nil {
		return err
	}
	return prepared.Run(ctx)
}

// prepareControllerManager parses the kube-controller-manager flags and
// returns a function running it. It must be called before the API server's
// flags are set up: its options adjust feature-gate defaults, which is only
// possible until the process-wide gates are closed.
func prepareControllerManager(args []string) (func(context.Context) error, error) {
	s, err := cmoptions.NewKubeControllerManagerOptions()
	if err != nil {
		return nil, err
	}
	all, disabled, aliases := cmapp.KnownControllers(), cmapp.ControllersDisabledByDefault(), cmapp.ControllerAliases()
	nfs := s.Flags(all, disabled, aliases)
	s.ParsedFlags = &nfs
	if err := parseInto("kube-controller-manager", nfs, args); err != nil {
		return nil, err
	}
	return func(ctx context.Context) error {
		if err := s.ComponentGlobalsRegistry.Set(); err != nil {
			return err
		}
		c, err := s.Config(ctx, all, disabled, aliases)
		if err != nil {
			return err
		}
		return cmapp.Run(ctx, c.Complete())
	}, nil
}

// prepareScheduler parses the kube-scheduler flags and returns a function
// running it.
func prepareScheduler(args []string) (func(context.Context) error, error) {
	opts := schedoptions.NewOptions()
	if err := parseInto("kube-scheduler", *opts.Flags, args); err != nil {
		return nil, err
	}
	return func(ctx context.Context) error {
		if err := opts.ComponentGlobalsRegistry.Set(); err != nil {
			return err
		}
		cc, sched, err := schedapp.Setup(ctx, opts)
		if err != nil {
			return err
		}
		return schedapp.Run(ctx, cc, sched)
	}, nil
}

// readyCheck is a readyz check backed by a function.
type readyCheck struct {
	name string
	fn   func() error
}

func (c readyCheck) Name() string                { return c.name }
func (c readyCheck) Check(_ *http.Request) error { return c.fn() }
