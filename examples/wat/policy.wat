;; The example policy in hand-written WebAssembly text:
;; - requests under the `limited-prefix` parameter (default "/api/") are
;;   rate-limited per client by the `per-client` limiter: 429 + Retry-After;
;; - requests whose URL has a query bypass the cache;
;; - responses get `x-policy: wat`.
;; The host loads .wat text directly; no assembler is needed.
(module
  (import "cistern" "request_get" (func $request_get (param i32 i32 i32) (result i32)))
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "cache_set" (func $cache_set (param i32 i64) (result i32)))
  (import "cistern" "respond" (func $respond (param i32 i32 i32) (result i32)))
  (import "cistern" "limiter_check" (func $limiter_check (param i32 i32 i32 i32) (result i32)))
  (import "cistern" "param_get" (func $param_get (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)

  ;; constants
  (data (i32.const 0)   "limited-prefix")  ;; 14
  (data (i32.const 16)  "/api/")           ;; 5
  (data (i32.const 32)  "per-client")      ;; 10
  (data (i32.const 48)  "retry-after")     ;; 11
  (data (i32.const 64)  "rate limited\n")  ;; 13
  (data (i32.const 80)  "x-policy")        ;; 8
  (data (i32.const 96)  "wat")             ;; 3
  ;; buffers: digits 112..124, ip 128..192, prefix 256..512, path 1024..3072

  (func $starts_with (param $s i32) (param $s_len i32) (param $p i32) (param $p_len i32) (result i32)
    (local $i i32)
    (if (i32.gt_s (local.get $p_len) (local.get $s_len)) (then (return (i32.const 0))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_s (local.get $i) (local.get $p_len)))
        (if (i32.ne (i32.load8_u (i32.add (local.get $s) (local.get $i)))
                    (i32.load8_u (i32.add (local.get $p) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 1))

  (func (export "cistern_abi_version") (result i32) (i32.const 1))

  (func (export "on_request") (result i32)
    (local $path_len i32) (local $prefix i32) (local $prefix_len i32)
    (local $ip_len i32) (local $wait i32) (local $i i32)
    ;; a query: bypass the cache
    (if (i32.ge_s (call $request_get (i32.const 3) (i32.const 0) (i32.const 0)) (i32.const 0))
      (then (drop (call $cache_set (i32.const 0) (i64.const 0)))))
    ;; the path, into 1024..3072
    (local.set $path_len (call $request_get (i32.const 2) (i32.const 1024) (i32.const 2048)))
    (if (i32.or (i32.lt_s (local.get $path_len) (i32.const 0))
                (i32.gt_s (local.get $path_len) (i32.const 2048)))
      (then (return (i32.const 0))))
    ;; the prefix parameter, or "/api/"
    (local.set $prefix (i32.const 256))
    (local.set $prefix_len
      (call $param_get (i32.const 0) (i32.const 14) (i32.const 0) (i32.const 256) (i32.const 256)))
    (if (i32.or (i32.lt_s (local.get $prefix_len) (i32.const 0))
                (i32.gt_s (local.get $prefix_len) (i32.const 256)))
      (then (local.set $prefix (i32.const 16)) (local.set $prefix_len (i32.const 5))))
    (if (i32.eqz (call $starts_with (i32.const 1024) (local.get $path_len)
                                    (local.get $prefix) (local.get $prefix_len)))
      (then (return (i32.const 0))))
    ;; ask the limiter about this client
    (local.set $ip_len (call $request_get (i32.const 6) (i32.const 128) (i32.const 64)))
    (if (i32.or (i32.lt_s (local.get $ip_len) (i32.const 0))
                (i32.gt_s (local.get $ip_len) (i32.const 64)))
      (then (return (i32.const 1))))
    (local.set $wait (call $limiter_check (i32.const 32) (i32.const 10) (i32.const 128) (local.get $ip_len)))
    (if (i32.lt_s (local.get $wait) (i32.const 0)) (then (return (i32.const 1))))
    (if (i32.gt_s (local.get $wait) (i32.const 0))
      (then
        ;; decimal digits, right-aligned in 112..124
        (local.set $i (i32.const 124))
        (loop $digit
          (local.set $i (i32.sub (local.get $i) (i32.const 1)))
          (i32.store8 (local.get $i)
            (i32.add (i32.const 48) (i32.rem_u (local.get $wait) (i32.const 10))))
          (local.set $wait (i32.div_u (local.get $wait) (i32.const 10)))
          (br_if $digit (i32.gt_u (local.get $wait) (i32.const 0))))
        (drop (call $header_set (i32.const 1) (i32.const 48) (i32.const 11)
                                (local.get $i) (i32.sub (i32.const 124) (local.get $i))))
        (drop (call $respond (i32.const 429) (i32.const 64) (i32.const 13)))))
    (i32.const 0))

  (func (export "on_response") (result i32)
    (i32.lt_s
      (call $header_set (i32.const 1) (i32.const 80) (i32.const 8) (i32.const 96) (i32.const 3))
      (i32.const 0))))
