package main

// A small node/pod simulator: it registers fake nodes, keeps their leases
// fresh and plays the kubelet's part for pods bound to them, so controllers
// see pods become Running/Ready/Succeeded/Failed without any container runtime.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

const (
	annoReady      = "sim.flotilla.io/ready"       // "false": Running but never Ready
	annoExitCode   = "sim.flotilla.io/exit-code"   // non-zero: the containers exit with this code
	annoDuration   = "sim.flotilla.io/duration"    // run time of completing pods (default 1s)
	annoReadyDelay = "sim.flotilla.io/ready-delay" // delay before a running pod becomes Ready

	defaultRunDuration = time.Second
	leaseDuration      = 40
	leaseRenewInterval = 10 * time.Second
	nodeStatusInterval = time.Minute
)

type simNode struct {
	name  string
	index int
	ip    string

	mu  sync.Mutex
	ips map[string]types.UID // pod IP -> pod UID
}

type simulator struct {
	client kubernetes.Interface
	nodes  map[string]*simNode
	order  []*simNode

	podLister corelisters.PodLister
	queue     workqueue.TypedRateLimitingInterface[string]
	nodesUp   atomic.Bool
	podIPs    sync.Map // pod UID -> *simNode, for IP release
}

func newSimulator(client kubernetes.Interface, count int, prefix string) *simulator {
	s := &simulator{client: client, nodes: map[string]*simNode{}}
	for i := 1; i <= count; i++ {
		n := &simNode{
			name:  fmt.Sprintf("%s%d", prefix, i),
			index: i,
			ip:    fmt.Sprintf("172.31.0.%d", 10+i),
			ips:   map[string]types.UID{},
		}
		s.nodes[n.name] = n
		s.order = append(s.order, n)
	}
	s.queue = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](50*time.Millisecond, 5*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "sim-pods"})
	return s
}

// Ready reports whether all simulated nodes have been registered.
func (s *simulator) Ready() error {
	if !s.nodesUp.Load() {
		return fmt.Errorf("simulated nodes not registered yet")
	}
	return nil
}

func (s *simulator) Run(ctx context.Context) {
	defer s.queue.ShutDown()
	logger := klog.FromContext(ctx).WithName("sim")

	// Register the nodes (retry until the API server takes them).
	for _, n := range s.order {
		_ = wait.PollUntilContextCancel(ctx, 200*time.Millisecond, true, func(ctx context.Context) (bool, error) {
			if err := s.registerNode(ctx, n); err != nil {
				logger.V(2).Info("registering node", "node", n.name, "err", err)
				return false, nil
			}
			return true, nil
		})
		if ctx.Err() != nil {
			return
		}
		go s.heartbeat(ctx, n)
	}
	s.nodesUp.Store(true)
	logger.V(1).Info("simulated nodes registered", "count", len(s.order))

	factory := informers.NewSharedInformerFactory(s.client, 0)
	podInformer := factory.Core().V1().Pods()
	s.podLister = podInformer.Lister()
	enqueue := func(obj interface{}) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			s.queue.Add(key)
		}
	}
	_, _ = podInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj interface{}) { enqueue(obj) },
		DeleteFunc: func(obj interface{}) {
			if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			if pod, ok := obj.(*corev1.Pod); ok {
				s.releaseIP(pod.UID)
			}
		},
	})
	factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), podInformer.Informer().HasSynced) {
		return
	}
	const workers = 4
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s.processNext(ctx) {
			}
		}()
	}
	<-ctx.Done()
	s.queue.ShutDown()
	factory.Shutdown()
	wg.Wait()
}

func (s *simulator) processNext(ctx context.Context) bool {
	key, quit := s.queue.Get()
	if quit {
		return false
	}
	defer s.queue.Done(key)
	requeueAfter, err := s.syncPod(ctx, key)
	switch {
	case err != nil:
		if ctx.Err() == nil {
			klog.FromContext(ctx).V(2).Info("sim: pod sync failed, retrying", "pod", key, "err", err)
		}
		s.queue.AddRateLimited(key)
	default:
		s.queue.Forget(key)
		if requeueAfter > 0 {
			s.queue.AddAfter(key, requeueAfter)
		}
	}
	return true
}

// ---------------------------------------------------------------- nodes

func (s *simulator) nodeObject(n *simNode) *corev1.Node {
	res := corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse("32"),
		corev1.ResourceMemory:           resource.MustParse("256Gi"),
		corev1.ResourcePods:             resource.MustParse("110"),
		corev1.ResourceEphemeralStorage: resource.MustParse("1Ti"),
	}
	cidr := fmt.Sprintf("10.244.%d.0/24", n.index)
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: n.name,
			Labels: map[string]string{
				"kubernetes.io/hostname":           n.name,
				"kubernetes.io/os":                 "linux",
				"kubernetes.io/arch":               "amd64",
				"beta.kubernetes.io/os":            "linux",
				"beta.kubernetes.io/arch":          "amd64",
				"node.kubernetes.io/instance-type": "simulated",
				"sim.flotilla.io/node":             "true",
			},
			Annotations: map[string]string{"node.alpha.kubernetes.io/ttl": "0"},
		},
		Spec: corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}, ProviderID: "sim://" + n.name},
		Status: corev1.NodeStatus{
			Capacity:    res,
			Allocatable: res.DeepCopy(),
			Phase:       corev1.NodeRunning,
			Addresses: []corev1.NodeAddress{
				{Type: corev1.NodeInternalIP, Address: n.ip},
				{Type: corev1.NodeHostName, Address: n.name},
			},
			DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: 10250}},
			NodeInfo: corev1.NodeSystemInfo{
				MachineID:               fakeID(n.name, "machine"),
				SystemUUID:              fakeID(n.name, "system"),
				BootID:                  fakeID(n.name, "boot"),
				KernelVersion:           "6.1.0-sim",
				OSImage:                 "kube-testcluster simulated node",
				ContainerRuntimeVersion: "sim://1.0.0",
				KubeletVersion:          kubeVersion,
				OperatingSystem:         "linux",
				Architecture:            "amd64",
			},
		},
	}
}

func fakeID(parts ...string) string {
	h := sha256.Sum256([]byte(strings.Join(parts, "/")))
	return hex.EncodeToString(h[:16])
}

func nodeConditions(now metav1.Time, since metav1.Time) []corev1.NodeCondition {
	mk := func(t corev1.NodeConditionType, st corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: st, Reason: reason, Message: msg, LastHeartbeatTime: now, LastTransitionTime: since}
	}
	return []corev1.NodeCondition{
		mk(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
		mk(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
		mk(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
		mk(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "simulated kubelet is posting ready status"),
	}
}

func (s *simulator) registerNode(ctx context.Context, n *simNode) error {
	want := s.nodeObject(n)
	node, err := s.client.CoreV1().Nodes().Get(ctx, n.name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		node, err = s.client.CoreV1().Nodes().Create(ctx, want, metav1.CreateOptions{})
	}
	if err != nil {
		return err
	}
	now := metav1.Now()
	node = node.DeepCopy()
	node.Status = want.Status
	node.Status.Conditions = nodeConditions(now, now)
	if _, err := s.client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		return err
	}
	return s.renewLease(ctx, n)
}

func (s *simulator) renewLease(ctx context.Context, n *simNode) error {
	leases := s.client.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	lease, err := leases.Get(ctx, n.name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = leases.Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{
				Name: n.name,
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "v1", Kind: "Node", Name: n.name, UID: s.nodeUID(ctx, n.name),
				}},
			},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       ptr.To(n.name),
				LeaseDurationSeconds: ptr.To[int32](leaseDuration),
				RenewTime:            &now,
			},
		}, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	lease.Spec.RenewTime = &now
	lease.Spec.HolderIdentity = ptr.To(n.name)
	lease.Spec.LeaseDurationSeconds = ptr.To[int32](leaseDuration)
	_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
	return err
}

func (s *simulator) nodeUID(ctx context.Context, name string) types.UID {
	node, err := s.client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return ""
	}
	return node.UID
}

// heartbeat renews the node lease often and refreshes the node conditions now
// and then, so the node lifecycle controller keeps the node Ready. It also
// re-creates the node if somebody deleted it.
func (s *simulator) heartbeat(ctx context.Context, n *simNode) {
	logger := klog.FromContext(ctx).WithName("sim")
	lastStatus := time.Now()
	ticker := time.NewTicker(leaseRenewInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		if time.Since(lastStatus) >= nodeStatusInterval {
			if err := s.refreshNodeStatus(ctx, n); err != nil {
				logger.V(2).Info("node status refresh failed", "node", n.name, "err", err)
			} else {
				lastStatus = time.Now()
			}
		}
		if err := s.renewLease(ctx, n); err != nil && ctx.Err() == nil {
			logger.V(2).Info("lease renewal failed", "node", n.name, "err", err)
		}
	}
}

func (s *simulator) refreshNodeStatus(ctx context.Context, n *simNode) error {
	node, err := s.client.CoreV1().Nodes().Get(ctx, n.name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return s.registerNode(ctx, n)
	}
	if err != nil {
		return err
	}
	now := metav1.Now()
	since := now
	for _, c := range node.Status.Conditions {
		if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
			since = c.LastTransitionTime
		}
	}
	node = node.DeepCopy()
	node.Status.Conditions = nodeConditions(now, since)
	_, err = s.client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	return err
}

// ----------------------------------------------------------------- pods

func (n *simNode) allocateIP(uid types.UID) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	for ip, owner := range n.ips {
		if owner == uid {
			return ip
		}
	}
	for host := 2; host < 255; host++ {
		ip := fmt.Sprintf("10.244.%d.%d", n.index, host)
		if _, used := n.ips[ip]; !used {
			n.ips[ip] = uid
			return ip
		}
	}
	return fmt.Sprintf("10.244.%d.254", n.index)
}

func (n *simNode) reserveIP(ip string, uid types.UID) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.ips[ip] = uid
}

func (s *simulator) releaseIP(uid types.UID) {
	v, ok := s.podIPs.LoadAndDelete(uid)
	if !ok {
		return
	}
	n := v.(*simNode)
	n.mu.Lock()
	defer n.mu.Unlock()
	for ip, owner := range n.ips {
		if owner == uid {
			delete(n.ips, ip)
		}
	}
}

func completes(pod *corev1.Pod) bool {
	return pod.Spec.RestartPolicy == corev1.RestartPolicyNever || pod.Spec.RestartPolicy == corev1.RestartPolicyOnFailure
}

func exitCode(pod *corev1.Pod) int32 {
	if v, ok := pod.Annotations[annoExitCode]; ok {
		if c, err := strconv.Atoi(strings.TrimSpace(v)); err == nil {
			return int32(c)
		}
	}
	return 0
}

func annoDurationOr(pod *corev1.Pod, key string, def time.Duration) time.Duration {
	if v, ok := pod.Annotations[key]; ok {
		if d, err := time.ParseDuration(strings.TrimSpace(v)); err == nil && d >= 0 {
			return d
		}
	}
	return def
}

func (s *simulator) syncPod(ctx context.Context, key string) (time.Duration, error) {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return 0, nil
	}
	pod, err := s.podLister.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	node, ours := s.nodes[pod.Spec.NodeName]
	if !ours {
		return 0, nil
	}

	// A bound pod is deleted gracefully: the kubelet has to confirm. Do that
	// at once so namespaces and scale-downs finish quickly.
	if pod.DeletionTimestamp != nil {
		err := s.client.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{
			GracePeriodSeconds: ptr.To[int64](0),
			Preconditions:      &metav1.Preconditions{UID: &pod.UID},
		})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			return 0, err
		}
		s.releaseIP(pod.UID)
		return 0, nil
	}

	switch pod.Status.Phase {
	case corev1.PodSucceeded, corev1.PodFailed:
		s.releaseIP(pod.UID)
		return 0, nil
	case corev1.PodRunning:
		if pod.Status.PodIP != "" && !pod.Spec.HostNetwork {
			node.reserveIP(pod.Status.PodIP, pod.UID)
			s.podIPs.Store(pod.UID, node)
		}
		return s.syncRunning(ctx, pod)
	default:
		return s.startPod(ctx, pod, node)
	}
}

func setCondition(status *corev1.PodStatus, t corev1.PodConditionType, st corev1.ConditionStatus, reason, msg string, now metav1.Time) {
	for i := range status.Conditions {
		c := &status.Conditions[i]
		if c.Type == t {
			if c.Status != st {
				c.LastTransitionTime = now
			}
			c.Status, c.Reason, c.Message = st, reason, msg
			return
		}
	}
	status.Conditions = append(status.Conditions, corev1.PodCondition{
		Type: t, Status: st, Reason: reason, Message: msg, LastTransitionTime: now,
	})
}

func boolStatus(b bool) corev1.ConditionStatus {
	if b {
		return corev1.ConditionTrue
	}
	return corev1.ConditionFalse
}

func containerID(pod *corev1.Pod, name string) string {
	return "sim://" + fakeID(string(pod.UID), name) + fakeID(name, string(pod.UID))
}

func imageID(image string) string {
	h := sha256.Sum256([]byte(image))
	repo := image
	if i := strings.IndexAny(repo, "@"); i >= 0 {
		repo = repo[:i]
	}
	return repo + "@sha256:" + hex.EncodeToString(h[:])
}

// startPod moves a freshly bound pod to Running.
func (s *simulator) startPod(ctx context.Context, pod *corev1.Pod, node *simNode) (time.Duration, error) {
	now := metav1.Now()
	st := pod.Status.DeepCopy()
	st.Phase = corev1.PodRunning
	st.HostIP = node.ip
	st.HostIPs = []corev1.HostIP{{IP: node.ip}}
	ip := node.ip
	if !pod.Spec.HostNetwork {
		ip = node.allocateIP(pod.UID)
		s.podIPs.Store(pod.UID, node)
	}
	st.PodIP = ip
	st.PodIPs = []corev1.PodIP{{IP: ip}}
	if st.StartTime == nil {
		st.StartTime = &now
	}
	st.Reason, st.Message = "", ""

	st.InitContainerStatuses = nil
	for _, c := range pod.Spec.InitContainers {
		cs := corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: imageID(c.Image), ContainerID: containerID(pod, c.Name),
		}
		if c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			// native sidecar: keeps running
			cs.Ready, cs.Started = true, ptr.To(true)
			cs.State.Running = &corev1.ContainerStateRunning{StartedAt: now}
		} else {
			cs.Ready, cs.Started = true, ptr.To(false)
			cs.State.Terminated = &corev1.ContainerStateTerminated{
				ExitCode: 0, Reason: "Completed", StartedAt: now, FinishedAt: now, ContainerID: cs.ContainerID,
			}
		}
		st.InitContainerStatuses = append(st.InitContainerStatuses, cs)
	}
	st.ContainerStatuses = nil
	for _, c := range pod.Spec.Containers {
		st.ContainerStatuses = append(st.ContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: imageID(c.Image), ContainerID: containerID(pod, c.Name),
			Started: ptr.To(true),
			State:   corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		})
	}
	setCondition(st, corev1.PodReadyToStartContainers, corev1.ConditionTrue, "", "", now)
	setCondition(st, corev1.PodInitialized, corev1.ConditionTrue, "", "", now)
	setCondition(st, corev1.PodScheduled, corev1.ConditionTrue, "", "", now)
	s.applyReadiness(pod, st, now)

	updated := pod.DeepCopy()
	updated.Status = *st
	if _, err := s.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, updated, metav1.UpdateOptions{}); err != nil {
		return 0, err
	}
	return s.nextCheck(pod, now.Time), nil
}

// applyReadiness sets container readiness and the Ready conditions of a
// running pod from its annotations. It returns whether anything changed.
func (s *simulator) applyReadiness(pod *corev1.Pod, st *corev1.PodStatus, now metav1.Time) bool {
	code := exitCode(pod)
	crashing := code != 0 && !completes(pod)
	wantReady := pod.Annotations[annoReady] != "false" && !crashing
	if wantReady {
		started := now.Time
		if st.StartTime != nil {
			started = st.StartTime.Time
		}
		if now.Time.Before(started.Add(annoDurationOr(pod, annoReadyDelay, 0))) {
			wantReady = false
		}
	}
	changed := false
	var unready []string
	for i := range st.ContainerStatuses {
		cs := &st.ContainerStatuses[i]
		if crashing && cs.State.Waiting == nil {
			// restartPolicy Always and a failing exit code: CrashLoopBackOff.
			startedAt := now
			if cs.State.Running != nil {
				startedAt = cs.State.Running.StartedAt
			}
			cs.LastTerminationState = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
				ExitCode: code, Reason: "Error", StartedAt: startedAt, FinishedAt: now, ContainerID: cs.ContainerID,
			}}
			cs.State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{
				Reason:  "CrashLoopBackOff",
				Message: fmt.Sprintf("back-off restarting failed container %s in pod %s_%s", cs.Name, pod.Name, pod.Namespace),
			}}
			cs.RestartCount++
			cs.Started = ptr.To(false)
			changed = true
		}
		if cs.Ready != wantReady {
			cs.Ready = wantReady
			changed = true
		}
		if !cs.Ready {
			unready = append(unready, cs.Name)
		}
	}
	reason, msg := "", ""
	if !wantReady {
		reason = "ContainersNotReady"
		msg = fmt.Sprintf("containers with unready status: [%s]", strings.Join(unready, " "))
	}
	before := conditionStatus(st, corev1.PodReady)
	setCondition(st, corev1.ContainersReady, boolStatus(wantReady), reason, msg, now)
	setCondition(st, corev1.PodReady, boolStatus(wantReady), reason, msg, now)
	if before != boolStatus(wantReady) {
		changed = true
	}
	return changed
}

func conditionStatus(st *corev1.PodStatus, t corev1.PodConditionType) corev1.ConditionStatus {
	for _, c := range st.Conditions {
		if c.Type == t {
			return c.Status
		}
	}
	return corev1.ConditionUnknown
}

// nextCheck tells when a running pod needs another look (completion or a
// delayed readiness change), or 0 if never.
func (s *simulator) nextCheck(pod *corev1.Pod, started time.Time) time.Duration {
	var at time.Time
	if completes(pod) {
		at = started.Add(annoDurationOr(pod, annoDuration, defaultRunDuration))
	} else if d := annoDurationOr(pod, annoReadyDelay, 0); d > 0 && pod.Annotations[annoReady] != "false" {
		at = started.Add(d)
	} else {
		return 0
	}
	wait := time.Until(at)
	if wait <= 0 {
		wait = 10 * time.Millisecond
	}
	return wait
}

func (s *simulator) syncRunning(ctx context.Context, pod *corev1.Pod) (time.Duration, error) {
	now := metav1.Now()
	started := now.Time
	if pod.Status.StartTime != nil {
		started = pod.Status.StartTime.Time
	}
	if completes(pod) {
		finishAt := started.Add(annoDurationOr(pod, annoDuration, defaultRunDuration))
		if now.Time.Before(finishAt) {
			return time.Until(finishAt) + 10*time.Millisecond, nil
		}
		return 0, s.finishPod(ctx, pod, now)
	}
	st := pod.Status.DeepCopy()
	if s.applyReadiness(pod, st, now) {
		updated := pod.DeepCopy()
		updated.Status = *st
		if _, err := s.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, updated, metav1.UpdateOptions{}); err != nil {
			return 0, err
		}
	}
	if d := annoDurationOr(pod, annoReadyDelay, 0); d > 0 && now.Time.Before(started.Add(d)) {
		return time.Until(started.Add(d)) + 10*time.Millisecond, nil
	}
	return 0, nil
}

// finishPod terminates all containers of a completing pod.
func (s *simulator) finishPod(ctx context.Context, pod *corev1.Pod, now metav1.Time) error {
	code := exitCode(pod)
	st := pod.Status.DeepCopy()
	reason := "Completed"
	st.Phase = corev1.PodSucceeded
	if code != 0 {
		reason = "Error"
		st.Phase = corev1.PodFailed
	}
	for i := range st.ContainerStatuses {
		cs := &st.ContainerStatuses[i]
		startedAt := now
		if cs.State.Running != nil {
			startedAt = cs.State.Running.StartedAt
		}
		cs.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
			ExitCode: code, Reason: reason, StartedAt: startedAt, FinishedAt: now, ContainerID: cs.ContainerID,
		}}
		cs.Ready = false
		cs.Started = ptr.To(false)
	}
	for i := range st.InitContainerStatuses {
		cs := &st.InitContainerStatuses[i]
		if cs.State.Running != nil { // sidecars stop too
			cs.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
				ExitCode: 0, Reason: "Completed", StartedAt: cs.State.Running.StartedAt, FinishedAt: now, ContainerID: cs.ContainerID,
			}}
			cs.Ready = false
			cs.Started = ptr.To(false)
		}
	}
	setCondition(st, corev1.PodReadyToStartContainers, corev1.ConditionFalse, "", "", now)
	setCondition(st, corev1.ContainersReady, corev1.ConditionFalse, "PodCompleted", "", now)
	setCondition(st, corev1.PodReady, corev1.ConditionFalse, "PodCompleted", "", now)
	updated := pod.DeepCopy()
	updated.Status = *st
	if _, err := s.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, updated, metav1.UpdateOptions{}); err != nil {
		return err
	}
	s.releaseIP(pod.UID)
	return nil
}
