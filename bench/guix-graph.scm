;; Driven by `bench/run.py guix`, through Guix 1.5's own client library against whichever
;; daemon $GUIX_DAEMON_SOCKET names: $BENCH_N derivations ($BENCH_KIND: "chain", each
;; depending on the one before, or "dag", layers of 50 each depending on 3 of the layer
;; below) whose builder is a shell ($BENCH_SH, this machine's, so that it runs inside the
;; sid root and outside it alike) added to the store (guix-daemon 1.5 refuses builders
;; outside it). Their `.drv` files are added through the daemon as the derivations are made,
;; then one `build-derivations` builds them all. Prints "add SECONDS build SECONDS".
(use-modules (guix store) (guix derivations) (ice-9 format))

(define kind (getenv "BENCH_KIND"))
(define n (string->number (getenv "BENCH_N")))
(define width 50)

(define (now)
  (let ((t (gettimeofday)))
    (+ (car t) (/ (cdr t) 1000000.))))

(define (make store sh name deps i)
  (derivation store name sh
              (list "-c"
                    (format #f "echo ~a ~{~a ~}> $out" i
                            (map derivation->output-path deps)))
              #:sources (list sh)
              #:inputs (map derivation-input deps)))

(with-store store
  (let* ((sh (add-to-store store "sh" #t "sha256" (getenv "BENCH_SH")))
         (t0 (now))
         (drvs
          (if (string=? kind "chain")
              (let loop ((i 0) (prev '()) (acc '()))
                (if (= i n)
                    (reverse acc)
                    (let ((d (make store sh (format #f "chain~a" i) prev i)))
                      (loop (+ i 1) (list d) (cons d acc)))))
              (let loop ((i 0) (below #f) (layer '()) (acc '()))
                (cond
                 ((= i n) (reverse acc))
                 (else
                  (let* ((col (modulo i width))
                         (below* (if (and (= col 0) (> i 0))
                                     (list->vector (reverse layer))
                                     below))
                         (layer* (if (and (= col 0) (> i 0)) '() layer))
                         (deps (if below*
                                   (map (lambda (k)
                                          (vector-ref below* (modulo (+ col k) width)))
                                        '(0 1 7))
                                   '()))
                         (d (make store sh (format #f "dag~a" i) deps i)))
                    (loop (+ i 1) below* (cons d layer*) (cons d acc))))))))
         (t1 (now)))
    (build-derivations store drvs)
    (format #t "add ~,3f build ~,3f~%" (- t1 t0) (- (now) t1))))
