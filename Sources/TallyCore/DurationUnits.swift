extension Duration {
    /// Whole milliseconds, truncated.
    public var totalMilliseconds: Int64 {
        components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000
    }

    /// Whole nanoseconds, truncated (what swift-metrics timers take).
    public var totalMicroseconds: Int64 { totalNanoseconds / 1_000 }

    public var totalNanoseconds: Int64 {
        components.seconds * 1_000_000_000 + components.attoseconds / 1_000_000_000
    }

    /// Seconds as a floating-point number, for rates and `Thread.sleep`.
    public var totalSeconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}
